"""The monitor where users train: transformers.Trainer (hf.py: NanMonitorCallback) and any
Lightning Trainer (lightning.py: nan_monitor), both on the one step judge
(nanlab/diagnosis/judge.py), and the fixes the committed map measured per cause (fixes.py)."""
