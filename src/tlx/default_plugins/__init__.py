"""tlx's own components, registered through the same hooks as third-party plugins."""
