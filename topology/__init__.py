"""sinkstream topology: topic definitions, message schemas and the faust ingress router."""
