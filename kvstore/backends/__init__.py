"""Where a store's nodes live and how they are committed.

  interface   the contract every backend keeps (`Backend`, the `GroupCommit` capability,
              `GarbageScope`/`GarbageReport`)
  rename      `RenameCommit`: local directories (staging folder + one rename per commit)
  marker      `MarkerCommit`: object stores and ``memory://`` (attempt prefixes + conditional markers)
  factory     `open_backend`: the backend of a location

Both implementations share TensorStore's I/O (`vinekv.kvstore.tensorstore_backend.TensorStoreBackend`).
"""
