"""Experiments that drive the whole pipeline (data → pretraining → finetuning sweep) as subprocesses.

They sit above ``ssl_pretrain`` and ``downstream``: nothing in those packages imports them.
``label_efficiency`` is the demo's stage runner (``launch/demo.py``).
"""
