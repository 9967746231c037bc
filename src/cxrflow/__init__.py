"""cxrflow: chest X-ray collections from raw images to an evaluated multi-label classifier."""

__version__ = "0.1.0"
