//! The harness on the in-memory broker: what it reports of a service is what happened.

use super::*;
use crate::{Conejo, Context, Handler, HandlerError};

struct Orders;
impl Handler for Orders {
    type Message = String;
    async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_delivery_whose_connection_drops_is_redelivered_once() {
    let broker = TestBroker::memory();
    broker
        .declare_queue(&TestQueue::new("orders"))
        .await
        .unwrap();
    let service = broker
        .start(Conejo::builder(broker.url()).queue("orders", Orders))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    faults.drop_connection_after_deliveries(1);
    broker.send("orders", "first").await.unwrap();
    service
        .until("reconnected", |s| s.status().reconnects() == 1)
        .await
        .unwrap();
    service.idle().await.unwrap();
    let handled: Vec<(HandledAs, bool)> = service
        .handled("orders")
        .iter()
        .map(|h| (h.outcome, h.redelivered))
        .collect();
    assert_eq!(
        handled,
        [
            (HandledAs::Acked, false),
            (HandledAs::RedeliveryCounted, true),
            (HandledAs::Acked, false),
        ]
    );
    assert_eq!(broker.ready("orders").await.unwrap(), 0);
    service.stop().await.unwrap();
}
