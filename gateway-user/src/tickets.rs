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
/// TLS 1.3 tickets kept in all, as many as rustls's own store keeps (8 for each of 32
/// servers), so the memory they can hold is no more than there: a ticket carries its own copy
/// of the server's certificate chain, a few KiB for a public API (and as much as a server
/// sends). Any one server may have them all: how many dials at once to one API can each resume
/// a session.
const TICKETS: usize = 256;

/// The upstream client's session store. TLS 1.3 tickets are kept here; key-exchange hints and
/// TLS 1.2 sessions (one per server, reusable) as rustls keeps them.
pub struct Tickets {
    tls13: Mutex<Bounded<ServerName<'static>, Tls13ClientSessionValue>>,
    rest: ClientSessionMemoryCache,
}

impl Tickets {
    pub fn new() -> Self {
        Self {
            tls13: Mutex::new(Bounded::new(SERVERS, TICKETS)),
            // rustls's store keeps a server per 8 of its size.
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
            .field("servers", &tls13.key_count())
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

/// Up to `total` values in all, under up to `keys` keys. Past `total`, the oldest value goes,
/// whichever key holds it; a new key past `keys` evicts the key pushed to longest ago. A key's
/// newest value is taken first (a ticket is used once, and the newest lives longest).
struct Bounded<K, V> {
    /// Each key's values, oldest first.
    values: HashMap<K, Stamped<V>>,
    pushed: u64,
    len: usize,
    keys: usize,
    total: usize,
}

/// Values, each stamped with when it was pushed.
type Stamped<V> = VecDeque<(u64, V)>;

impl<K: Clone + Eq + Hash, V> Bounded<K, V> {
    fn new(keys: usize, total: usize) -> Self {
        Self {
            values: HashMap::new(),
            pushed: 0,
            len: 0,
            keys,
            total,
        }
    }

    fn push(&mut self, key: K, value: V) {
        if !self.values.contains_key(&key) && self.values.len() == self.keys {
            let stale = self
                .values
                .iter()
                .min_by_key(|(_, list)| list.back().map(|(at, _)| *at))
                .map(|(k, _)| k.clone());
            if let Some(list) = stale.and_then(|k| self.values.remove(&k)) {
                self.len -= list.len();
            }
        }
        if self.len == self.total {
            let oldest = self
                .values
                .iter()
                .min_by_key(|(_, list)| list.front().map(|(at, _)| *at))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.remove(&k, VecDeque::pop_front);
            }
        }
        self.pushed += 1;
        self.values
            .entry(key)
            .or_default()
            .push_back((self.pushed, value));
        self.len += 1;
    }

    fn take(&mut self, key: &K) -> Option<V> {
        self.remove(key, VecDeque::pop_back)
    }

    /// Removes one of `key`'s values (`end` says which), and the key with its last.
    fn remove(&mut self, key: &K, end: fn(&mut Stamped<V>) -> Option<(u64, V)>) -> Option<V> {
        let list = self.values.get_mut(key)?;
        let (_, value) = end(list)?;
        if list.is_empty() {
            self.values.remove(key);
        }
        self.len -= 1;
        Some(value)
    }

    fn key_count(&self) -> usize {
        self.values.len()
    }

    fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::Bounded;

    #[test]
    fn a_keys_newest_value_is_taken_first_and_the_oldest_of_all_goes_past_the_total() {
        let mut b = Bounded::new(4, 4);
        b.push("api", 1);
        b.push("other", 2);
        for v in 3..=5 {
            b.push("api", v);
        }
        // Full at 4: pushing 5 dropped 1, the oldest of all.
        assert_eq!(b.len(), 4);
        assert_eq!(
            std::iter::from_fn(|| b.take(&"api")).collect::<Vec<_>>(),
            [5, 4, 3]
        );
        assert_eq!(b.take(&"other"), Some(2));
        assert_eq!((b.key_count(), b.len()), (0, 0));
    }

    #[test]
    fn one_key_may_hold_every_value() {
        let mut b = Bounded::new(4, 3);
        for v in 1..=3 {
            b.push("api", v);
        }
        b.push("api", 4);
        assert_eq!(
            std::iter::from_fn(|| b.take(&"api")).collect::<Vec<_>>(),
            [4, 3, 2]
        );
    }

    #[test]
    fn a_new_key_past_the_limit_evicts_the_one_pushed_to_longest_ago() {
        let mut b = Bounded::new(2, 8);
        b.push("a", 1);
        b.push("b", 2);
        b.push("a", 3);
        b.push("c", 4);
        assert_eq!(b.take(&"b"), None, "b was pushed to longest ago");
        assert_eq!(b.len(), 3);
        assert_eq!(b.take(&"a"), Some(3));
        assert_eq!(b.take(&"c"), Some(4));
        // A key emptied by takes leaves its place: "d" fits beside "a".
        b.push("d", 5);
        assert_eq!(b.take(&"a"), Some(1));
        assert_eq!(b.take(&"d"), Some(5));
        assert_eq!((b.key_count(), b.len()), (0, 0));
    }
}
