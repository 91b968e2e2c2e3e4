//! Decides which brokers the tests of this build have (see `contextflow-testenv`).

fn main() {
    contextflow_testenv::build::emit();
}
