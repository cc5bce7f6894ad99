"""
The nested test bed's own tools (not part of the sealvm product):

- `nested.harness.l1`: boot an L1 VM with an emulated IOMMU and run a
  command in it (`run_in_l1`);
- `nested.harness.iommufd`: cffi bindings to iommufd and IOMMUFD_TEST,
  used by the scenarios that run inside L1.

Importable as ``nested.harness`` both under pytest (tests/ on sys.path) and
inside L1 (``PYTHONPATH=tests``).
"""
