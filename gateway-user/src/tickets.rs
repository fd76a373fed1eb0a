//! Where the upstream TLS client keeps session tickets: as rustls's in-memory store does, but
//! with room for a burst of dials to one server. rustls keeps 8 TLS 1.3 tickets per server and
//! each resumption uses one up, so of a burst of more than 8 new connections to one API (a
//! spike of concurrent requests with no idle connection left) the rest paid for a full
//! handshake: a certificate chain verified again, and a signature.
use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::Mutex,
};

use rustls::{
    client::{
        ClientSessionMemoryCache, ClientSessionStore, Tls12ClientSessionValue,
        Tls13ClientSessionValue,
    },
    pki_types::ServerName,
    NamedGroup,
};

/// Servers whose TLS 1.3 tickets are kept; a new one takes the place of the one that received
/// a ticket longest ago. Policy hosts are few; a wildcard rule's names are bounded by this.
const SERVERS: usize = 32;
/// TLS 1.3 tickets kept per server: how many dials at once can each resume a session. A
/// ticket holds its own copy of the server's certificate chain (a few KiB for a public API),
/// so the store holds at most about 4 MiB (rustls's own about 1).
const TICKETS_PER_SERVER: usize = 32;

/// The upstream client's session store. TLS 1.3 tickets are kept here; key-exchange hints and
/// TLS 1.2 sessions (one per server, reusable) as rustls keeps them.
pub struct Tickets {
    tls13: Mutex<Bounded<ServerName<'static>, Tls13ClientSessionValue>>,
    rest: ClientSessionMemoryCache,
}

impl Tickets {
    pub fn new() -> Self {
        Self {
            tls13: Mutex::new(Bounded::new(SERVERS, TICKETS_PER_SERVER)),
            rest: ClientSessionMemoryCache::new(SERVERS * 8),
        }
    }

    fn tls13(
        &self,
    ) -> std::sync::MutexGuard<'_, Bounded<ServerName<'static>, Tls13ClientSessionValue>> {
        self.tls13
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for Tickets {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts only: tickets carry resumption secrets.
impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tls13 = self.tls13();
        f.debug_struct("Tickets")
            .field("servers", &tls13.keys())
            .field("tls13_tickets", &tls13.len())
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for Tickets {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.rest.set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.rest.kx_hint(server_name)
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.rest.set_tls12_session(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.rest.tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.rest.remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        self.tls13().push(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        self.tls13().take(server_name)
    }
}

/// Up to `per_key` values for each of up to `keys` keys. A full key drops its oldest value; a
/// new key past `keys` evicts the key whose last value came longest ago. The newest value is
/// taken first (a ticket is used once, and the newest lives longest).
struct Bounded<K, V> {
    values: HashMap<K, VecDeque<V>>,
    /// Keys, the one with the oldest last push first.
    order: VecDeque<K>,
    keys: usize,
    per_key: usize,
}

impl<K: Clone + Eq + Hash, V> Bounded<K, V> {
    fn new(keys: usize, per_key: usize) -> Self {
        Self {
            values: HashMap::new(),
            order: VecDeque::new(),
            keys,
            per_key,
        }
    }

    fn push(&mut self, key: K, value: V) {
        if let Some(at) = self.order.iter().position(|k| *k == key) {
            self.order.remove(at);
        } else if self.order.len() == self.keys {
            if let Some(oldest) = self.order.pop_front() {
                self.values.remove(&oldest);
            }
        }
        self.order.push_back(key.clone());
        let list = self.values.entry(key).or_default();
        if list.len() == self.per_key {
            list.pop_front();
        }
        list.push_back(value);
    }

    fn take(&mut self, key: &K) -> Option<V> {
        let list = self.values.get_mut(key)?;
        let value = list.pop_back();
        if list.is_empty() {
            self.values.remove(key);
            self.order.retain(|k| k != key);
        }
        value
    }

    fn keys(&self) -> usize {
        self.values.len()
    }

    fn len(&self) -> usize {
        self.values.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn the_newest_value_is_taken_first_and_a_full_key_drops_its_oldest() {
        let mut b = Bounded::new(4, 3);
        for v in 1..=5 {
            b.push("api", v);
        }
        assert_eq!(b.len(), 3);
        assert_eq!(
            std::iter::from_fn(|| b.take(&"api")).collect::<Vec<_>>(),
            [5, 4, 3]
        );
        assert_eq!((b.keys(), b.len()), (0, 0));
    }

    #[test]
    fn a_new_key_past_the_limit_evicts_the_one_pushed_to_longest_ago() {
        let mut b = Bounded::new(2, 8);
        b.push("a", 1);
        b.push("b", 2);
        b.push("a", 3);
        b.push("c", 4);
        assert_eq!(b.take(&"b"), None, "b had its last value longest ago");
        assert_eq!(b.take(&"a"), Some(3));
        assert_eq!(b.take(&"c"), Some(4));
        // A key emptied by takes leaves its place: "d" fits beside "a".
        b.push("d", 5);
        assert_eq!(b.take(&"a"), Some(1));
        assert_eq!(b.take(&"d"), Some(5));
        assert_eq!((b.keys(), b.len()), (0, 0));
    }
}
