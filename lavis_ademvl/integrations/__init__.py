"""Bridges from other tools to ADEM-VL: lmms_eval (the lmms-eval model plugin, imported only by lmms-eval)."""
