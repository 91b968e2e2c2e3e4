//! The Order Service: contextflow's reference application.
//!
//! `POST /orders` runs controller -> service (validates inventory) -> repository -> database in
//! one transaction that no function receives as a parameter; the tenant, taken from an
//! authenticated bearer token, restricts every query, also without a parameter; every log line
//! carries the request id, trace id and tenant; the call to the payment provider carries the
//! trace; the confirmation and the `order.confirmed` event, written to a transactional outbox
//! with the payment's decision, are delivered in the context of the request that paid.
//!
//! Module map: [`http`] (routes, middleware, controllers), [`service`], [`db`] (repositories),
//! [`outbox`] (the outbox worker and resolver), [`queue`] (in-process message queue), [`payment`] (client and in-process stub), [`context`] (the request context),
//! [`logging`], [`telemetry`] (OTLP export and an in-process receiver), [`app`] (start-up) and [`demo`] (the load run with its correctness check).
#![forbid(unsafe_code)]

pub mod app;
pub mod context;
pub mod db;
pub mod demo;
pub mod http;
pub mod logging;
pub mod outbox;
pub mod payment;
pub mod queue;
pub mod service;
pub mod telemetry;
