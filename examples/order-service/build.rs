//! Decides which local services the tests have (see `contextflow-testenv`): a PostgreSQL test
//! is ignored, with its reason, when `CONTEXTFLOW_PG_URL` is unset.

fn main() {
    contextflow_testenv::build::emit();
}
