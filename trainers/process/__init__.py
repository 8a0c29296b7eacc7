"""Process plumbing around a trial: the long-lived trainer that serves a sweep's slot, the protocol it
speaks over its pipe, child processes tied to their parent, the figure helper, and where side files go."""
