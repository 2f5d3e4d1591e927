"""Long-running drivers of the reconciler (the ``sync`` loop and its queues). Empty until continuous sync lands."""
