"""Process plumbing around a trial: the long-lived trainer that serves a sweep's slot, child
processes tied to their parent, the figure helper, and where side files (caches, stores) go."""
