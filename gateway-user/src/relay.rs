//! Wake-ups a task gives itself, kept inside the poll that caused them.
//!
//! A proxied exchange runs in one task: the client connection, the upstream connection, and
//! the channels between them (request body, response head, response body). A channel woken
//! by its other end in the same task would reschedule the task as if it had yielded, and
//! tokio's multi-threaded scheduler wakes an idle worker thread for every such yield, to
//! steal work that is not there. Polled through a [`Relay`], such a wake-up has the poll run
//! again at once; a wake-up from anywhere else (the I/O driver, another task) wakes the task.
use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering::SeqCst},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll, Wake, Waker},
};

/// Polls again at most this often before yielding to the scheduler for real. A proxied
/// exchange needs two or three (request body, response head, response body); a future that
/// yields on purpose (tokio's cooperative budget ran out) is polled this often in vain, then
/// yields.
const ROUNDS: usize = 8;

#[derive(Default)]
pub struct Relay {
    task: Mutex<Option<Waker>>,
    polling: AtomicBool,
    woken: AtomicBool,
}

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        // Either this sees the poll still running (and the poll sees `woken`), or the poll
        // has ended and the task is woken: no wake-up is lost.
        if !self.polling.load(SeqCst) {
            let task = self
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(task) = task {
                task.wake();
            }
        }
    }
}

impl Relay {
    /// Polls `f` with the relay as its waker, again while it was woken during its own poll.
    pub fn poll<T>(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        mut f: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        {
            let mut task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
            if !task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        let waker = Waker::from(Arc::clone(self));
        let mut inner = Context::from_waker(&waker);
        for _ in 0..ROUNDS {
            self.woken.store(false, SeqCst);
            self.polling.store(true, SeqCst);
            let polled = f(&mut inner);
            self.polling.store(false, SeqCst);
            if polled.is_ready() || !self.woken.swap(false, SeqCst) {
                return polled;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A future polled through its own [`Relay`].
pub struct Relayed<F> {
    inner: Pin<Box<F>>,
    relay: Arc<Relay>,
}

impl<F: Future> Relayed<F> {
    pub fn new(inner: F) -> Self {
        Self {
            inner: Box::pin(inner),
            relay: Arc::default(),
        }
    }
}

impl<F: Future> Future for Relayed<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        let inner = &mut this.inner;
        this.relay.poll(cx, |cx| inner.as_mut().poll(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts how often the task it stands for was woken.
    #[derive(Default)]
    struct Count(std::sync::atomic::AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, SeqCst);
        }
    }

    #[test]
    fn a_wake_during_the_poll_polls_again_instead_of_waking_the_task() {
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let mut polls = 0;
        // Wakes itself on its first two polls, ready on the third.
        let mut fut = Relayed::new(std::future::poll_fn(|cx| {
            polls += 1;
            if polls < 3 {
                cx.waker().wake_by_ref();
                Poll::Pending
            } else {
                Poll::Ready(polls)
            }
        }));
        assert_eq!(Pin::new(&mut fut).poll(&mut cx), Poll::Ready(3));
        assert_eq!(task.0.load(SeqCst), 0);
    }

    #[test]
    fn a_wake_after_the_poll_wakes_the_task() {
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let mut kept = None;
        let mut fut = Relayed::new(std::future::poll_fn(|cx| {
            kept = Some(cx.waker().clone());
            Poll::<()>::Pending
        }));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(task.0.load(SeqCst), 0);
        drop(fut);
        kept.expect("a waker").wake();
        assert_eq!(task.0.load(SeqCst), 1);
    }

    #[test]
    fn a_future_that_always_wakes_itself_still_yields() {
        let task = Arc::new(Count::default());
        let waker = Waker::from(Arc::clone(&task));
        let mut cx = Context::from_waker(&waker);
        let mut fut = Relayed::new(std::future::poll_fn(|cx| {
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        }));
        assert!(Pin::new(&mut fut).poll(&mut cx).is_pending());
        assert_eq!(task.0.load(SeqCst), 1);
    }
}
