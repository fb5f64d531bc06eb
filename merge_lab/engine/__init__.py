"""The merge engine: recipes, the plan (which key is merged how), block statistics and the streaming executor.

The package's API::

    from merge_lab.engine import Recipe, prepare, merge_to_file, merge_to_state_dict, MergeResult, MergePlan

Modules, each importing only those before it: recipe (the recipe and its checks); chunking (row chunks,
work units, slice sizes, the memory budget) and metadata (input hashes, the recipe hash, the output's
metadata), which name the plan's types for annotations only; plan (Input, KeyTask, MergePlan, `prepare`);
loader (a unit's inputs read and converted); block_stats (the per-block Gram matrices); executor (the
Executor, `merge_to_file`, `merge_to_state_dict`, MergeResult).
"""

from merge_lab.engine.executor import MergeResult, merge_to_file, merge_to_state_dict
from merge_lab.engine.metadata import build_metadata
from merge_lab.engine.plan import MergePlan, prepare
from merge_lab.engine.recipe import Recipe

__all__ = ["MergePlan", "MergeResult", "Recipe", "build_metadata", "merge_to_file", "merge_to_state_dict", "prepare"]
