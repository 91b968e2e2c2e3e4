//! Run with: cargo run -p order-service

fn main() {}
