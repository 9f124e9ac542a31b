"""sacrum-masks: sacrum masks for spine MRI with nnU-Net v2, as BIDS derivatives."""

__version__ = "0.1.0"

#: SCT's "RPI" orientation, in nibabel's axis codes (the direction each axis points *to*).
RPI_AXCODES = ("L", "A", "S")
