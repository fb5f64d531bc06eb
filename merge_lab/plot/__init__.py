"""Pictures of merges: the X/Y/Z plot, image grids and the θ heatmap."""
