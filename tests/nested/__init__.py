"""The nested VFIO tier: L0 tests (test_*.py) and the scenarios run inside L1 (l1_*.py)."""
