"""The shipped experiment configs, installed as `paligemma_ft.configs`: `--config NAME` loads `NAME.py` from here."""
