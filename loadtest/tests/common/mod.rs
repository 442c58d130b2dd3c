//! What the in-process load tests share: an edge configuration on free loopback ports, and
//! tenants with ingest keys.

use anyhow::Result;
use sink::{NewApiKey, Store};

/// The edge's defaults, listening on free loopback ports.
pub fn loopback_config() -> Result<edge::EdgeConfig> {
    Ok(edge::EdgeConfig {
        wire_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        ..edge::EdgeConfig::default()
    })
}

/// `tenants` tenants named `load-<n>`, each with one ingest key; the keys, in tenant order.
pub async fn tenants_with_ingest_keys(store: &Store, tenants: usize) -> Result<Vec<String>> {
    let mut keys = Vec::with_capacity(tenants);
    for index in 0..tenants {
        let tenant = store.create_tenant(&format!("load-{index}")).await?;
        let key = edge::auth::generate_api_key();
        let new_key = NewApiKey {
            tenant_id: tenant.id,
            key_hash: sink::hash_api_key(&key),
            prefix: key[..12].to_owned(),
            scopes: vec![sink::Scope::Ingest],
            label: None,
            expires_at_us: None,
        };
        store.create_api_key(&new_key).await?;
        keys.push(key);
    }
    Ok(keys)
}
