"""weft's end-to-end layer: the Helm chart tools, the images, the clusters (drivers) and the
chaos scenarios that run against them (see README.md)."""
