"""mri-ssl: self-supervised pretraining for MRI segmentation."""
