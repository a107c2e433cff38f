"""The data pipeline: images and labels in, batches out (loaders), with augmentation, resized caches, sizes, the digits demo data, config-to-data assembly and where caches go."""
