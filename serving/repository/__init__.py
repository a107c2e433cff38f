"""The models served: the repository's layout, the registry that switches versions, the watcher."""
