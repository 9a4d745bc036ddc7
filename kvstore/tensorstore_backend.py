"""TensorStore/Zarr v3 backend of the snapshot store: filled by the kvstore issue (#3)."""
