"""Built-in tasks and real-data loaders: datasets, answer extraction and exact rewards."""
