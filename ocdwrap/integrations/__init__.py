"""ocdwrap with the libraries users already train with. Import the one you need:

* :mod:`ocdwrap.integrations.transformers`: ``OCDTrainerCallback`` collects and fits OCD when a
  Hugging Face ``Trainer`` finishes, and saves the adapter beside the model;
* :mod:`ocdwrap.integrations.sentence_transformers`: ``SentenceClassifier`` (a SetFit-style
  classifier on sentence embeddings) and ``route`` (``encode`` / ``predict`` run through OCD).

torchvision models need no adapter: wrap them by layer name (docs/torchvision.md).
Multi-process collection and fitting live in :mod:`ocdwrap.distributed`.
"""
