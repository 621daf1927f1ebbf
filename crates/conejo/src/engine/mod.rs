//! The running core: connection generations, each queue's consumer, the hand-over to
//! workers, the dispatch of outcomes and the settlement of deliveries.

pub(crate) mod backoff;
pub(crate) mod consumer;
pub(crate) mod dispatch;
pub(crate) mod publish;
pub(crate) mod settle;
pub(crate) mod supervisor;
