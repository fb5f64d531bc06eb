"""The merge engine: recipes, the plan (which key is merged how), block statistics and the streaming executor."""
