"""Reference model definitions and small sample models for bnfold's tests, benchmarks and quick start.

Plain PyTorch (no torchvision). ``bnfold/`` never imports this package.

* :mod:`models.zoo` - ``ZOO`` (name -> factory, input shape), ``build(name, seed)`` (seeded weights,
  realistic BN statistics, eval mode), ``example_input(name, batch, seed)``;
* :mod:`models.lenet`, :mod:`models.mlp`, :mod:`models.resnet`, :mod:`models.mobilenet`,
  :mod:`models.unet`, :mod:`models.audio`, :mod:`models.preact` - the architectures;
* :mod:`models.stats` - ``randomize_bn``; :mod:`models.make_samples` - rewrites ``models/samples/``;
* :mod:`models.testing` - helpers tests share: ``run_onnx`` (onnxruntime, optimisations off), ``free_port``.
"""
