use contextflow::{AsyncLocal, FutureExt, Snapshot};

static ID: AsyncLocal<u32> = AsyncLocal::new();

fn assert_send<T: Send>(_: &T) {}
fn assert_sync<T: Sync>(_: &T) {}

#[test]
fn scope_and_with_context_are_send_when_the_future_is() {
    let scoped = ID.scope(1, async {});
    assert_send(&scoped);
    let with = async {}.in_current_context();
    assert_send(&with);
    let snapshot = Snapshot::capture();
    assert_send(&snapshot);
    assert_sync(&snapshot);
    assert_send(&ID);
    assert_sync(&ID);
}

#[test]
fn with_context_adds_one_pointer() {
    let inner = async {
        let buf = [0u8; 64];
        tokio::task::yield_now().await;
        buf.len()
    };
    let size = std::mem::size_of_val(&inner);
    let wrapped = inner.in_current_context();
    assert!(
        std::mem::size_of_val(&wrapped) <= size + std::mem::size_of::<usize>(),
        "WithContext adds more than a pointer: {} vs {}",
        std::mem::size_of_val(&wrapped),
        size
    );
    assert_eq!(
        std::mem::size_of::<Snapshot>(),
        std::mem::size_of::<usize>()
    );
}
