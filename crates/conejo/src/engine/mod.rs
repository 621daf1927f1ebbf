//! The running core, on the handler runtime. Its files follow a delivery's way, each using
//! only those after it:
//!
//! - `supervisor`: connection generations — connect, declare, run every queue, reconnect;
//! - `run`: one queue's life in a generation — consume a channel, reopen it when lost;
//! - `consumer`: consuming one channel — slots, deliveries, channel rotation, stopping;
//! - `balance`: when a borrowed partition goes back to its own replica;
//! - `channel`: opening a queue's channel, with its settle task and dispatch;
//! - `queue`: a registered queue, and what outlives its channels;
//! - `worker`: the hand-over to the workers that run the pipeline;
//! - `cursor`: a stream queue's offsets — where a subscription starts, what is committed;
//! - `ordering`: per-key ordering — deliveries waiting for their key, made ready in order;
//! - `job`: one delivery on its way from the consume loop to a worker;
//! - `dispatch`: one delivery — poison check, pipeline, outcome, retry copy or dead letter;
//! - `publish`: the confirmed publishes of retry copies and dead letters;
//! - `topology`: what conejo declares, through the broker boundary;
//! - `settle`: the settle task, which acks on the connection runtime (coalesced).
//!
//! May use: `broker`, `handler`, `service`, `config`, `observe` (counters and status, passed
//! in), `hooks`.

mod balance;
mod channel;
pub(crate) mod check;
mod consumer;
mod cursor;
mod dispatch;
mod job;
mod ordering;
mod publish;
pub(crate) mod queue;
mod run;
mod settle;
pub(crate) mod supervisor;
mod topology;
mod worker;

#[cfg(test)]
mod tests;
