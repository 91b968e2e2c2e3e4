//! Tenant isolation by row-level security (PostgreSQL).
