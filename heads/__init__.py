"""Inference modules (``ims``) and exit gates (``gates``), found through ``jei.registry.IMS``/``GATES``."""
