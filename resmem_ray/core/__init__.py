"""The method over arrays: ResMem's math, the sparse codec, gates, nearest-neighbour
search and merge. No Ray, no run directory."""
