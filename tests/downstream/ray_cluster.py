"""A two-node Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and a worker node, each its own raylet
with its own ports and one CPU), for the multi-node sweep test.

Prints ``ADDRESS HEAD_NODE_ID WORKER_NODE_ID`` once both nodes are up; a line ``kill`` on stdin kills the worker
node's processes (no graceful shutdown: a lost machine) and prints ``killed``; end of input shuts the cluster down.
"""

import os
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: every node on 127.0.0.1

from ray.cluster_utils import Cluster  # noqa: E402

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
worker = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
print(cluster.address, cluster.head_node.node_id, worker.node_id, flush=True)
for line in sys.stdin:
    if line.strip() == "kill":
        cluster.remove_node(worker, allow_graceful=False)
        print("killed", flush=True)
cluster.shutdown()
