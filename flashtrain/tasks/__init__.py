"""Tasks that ship with flashtrain (see :class:`flashtrain.Task`): the image classifier
of ``python -m flashtrain.jobs.imagenet`` and a tabular regression."""
