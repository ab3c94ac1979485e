"""Task library: each module registers one task builder in ``base.TASKS`` (see ``base.TaskData``)."""
