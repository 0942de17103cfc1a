"""The campus job's parts: the systems as sharing-platform tenants, and its report."""
