"""KV codecs (lossless zstd, int8 absmax + zstd): filled by the kvstore issue (#3)."""
