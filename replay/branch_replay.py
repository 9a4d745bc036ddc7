"""Offline branch replay of a stored run into MC values: filled by the replay issue (#4)."""
