-- The `shop` schema used by the demo and the tests: a small store holding fake PII.
-- Every value is invented; emails use example.com, SSNs use the never-issued 9xx area.
CREATE SCHEMA IF NOT EXISTS shop;

CREATE TABLE shop.customers (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    ssn         text NOT NULL,
    card_number text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shop.products (
    id          integer PRIMARY KEY,
    name        text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents >= 0)
);

CREATE TABLE shop.orders (
    id          integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES shop.customers (id),
    product_id  integer NOT NULL REFERENCES shop.products (id),
    quantity    integer NOT NULL CHECK (quantity > 0),
    ordered_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO shop.customers (id, name, email, ssn, card_number, created_at)
SELECT i,
       'Customer ' || i,
       'customer' || i || '@example.com',
       format('9%s-%s-%s', lpad((i % 100)::text, 2, '0'), lpad((i % 89 + 10)::text, 2, '0'),
              lpad((1000 + i)::text, 4, '0')),
       '4000' || lpad((100000000000 + i * 7919)::text, 12, '0'),
       timestamptz '2024-01-01 00:00:00+00' + i * interval '1 day'
FROM generate_series(1, 50) AS i;

INSERT INTO shop.products (id, name, price_cents) VALUES
    (1, 'Widget', 1999), (2, 'Gadget', 4999), (3, 'Gizmo', 999), (4, 'Doohickey', 250);

INSERT INTO shop.orders (id, customer_id, product_id, quantity, ordered_at)
SELECT i, 1 + (i * 7) % 50, 1 + i % 4, 1 + i % 3,
       timestamptz '2024-06-01 00:00:00+00' + i * interval '1 hour'
FROM generate_series(1, 200) AS i;
