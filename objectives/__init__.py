"""Training objectives (``jei``: the JEI-DNN bi-level loss), found through ``jei.registry.OBJECTIVES``."""
