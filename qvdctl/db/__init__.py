"""The node's state: SQLAlchemy Core tables, versioned migrations, data access."""
