"""Reference model definitions and small sample models for bnfold's tests, benchmarks and quick start.

Plain PyTorch (no torchvision). ``bnfold/`` never imports this package.
"""
