"""Data layer: scan folders into a Manifest, check the images, split leak-free, load them for training."""
