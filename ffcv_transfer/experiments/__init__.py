"""Plans that train and then read: removal designs and their runs, the demo (the main job), the planted-leak
trial.

May import: `ffcv_transfer.engine`, `ffcv_transfer.findings`, `ffcv_transfer.writers`, `ffcv_transfer.store`
and the top-level modules. Never `cli`.
"""
