/* nbd_int.h - private to the --nbd front end (frontends/nbd*.c): the
 * connection and its slots, shared by the files that serve one:
 *   nbd.c        registration, start/stop/status, a connection's life
 *   nbd_rx.c     the reader: requests and payloads from the socket, the
 *                poll before sleeping, held reply batches, starting requests
 *   nbd_tx.c     the slot pool and the sender: the reply queue, cork/uncork,
 *                completions
 *   nbd_reply.c  reply encoders (simple, structured, read chunks, block
 *                status, errors) into a slot's header and iovec
 *   nbd_fast.c   zero copy: in-place RAM reads/writes, spliced file I/O
 */
#ifndef DEVIO_FRONTENDS_NBD_INT_H
#define DEVIO_FRONTENDS_NBD_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include "devio/backend.h"
#include "devio/frontend.h"
#include "devio/tls.h"
#include "devio/util.h"
#include "../lib/nbd_proto.h"

#define NBD_RX_SIZE (64u << 10)   /* small: big payloads go straight to their slot */
#define NBD_RX_PAYLOAD (NBD_RX_SIZE / 2) /* payloads up to this come through the rx buffer */
#define NBD_LOG_REFUSED 8                  /* refused requests logged per connection */
#define NBD_MAX_CHUNKS 16                 /* content chunks in one sparse read */
#define NBD_SLOT_IOV (2 * NBD_MAX_CHUNKS + 2)
#define NBD_SLOT_HDR (NBD_MAX_CHUNKS * 32 + 128)

struct nbd_conn;

struct nbd_slot {
	struct devio_request req;
	struct nbd_conn *c;
	struct devio_nbd_request nr;
	uint8_t *buf;
	size_t cap;
	size_t held;          /* bytes counted against the connection's budget */
	uint32_t error;       /* NBD error decided before running, or 0 */
	int npieces;          /* a READ sent from the store in place: pieces[] */
	struct iovec pieces[NBD_MAX_CHUNKS];
	struct nbd_slot *next;
	int niov;
	struct iovec iov[NBD_SLOT_IOV];
	uint8_t hdr[NBD_SLOT_HDR];
};

struct nbd_state;

struct nbd_conn {
	struct nbd_state *st;
	int fd;
	struct devio_tls *tls;    /* after STARTTLS: every byte goes through it */
	char peer[64];
	struct devio_nbd_session s;
	struct devio_backend *b;
	bool use_workers;
	bool in_place_writes;     /* Unix socket: receive writes into the store */
	bool splice_writes;       /* large writes spliced through pipe[] */
	bool splice_reads;        /* large reads too */
	int pipe[2];
	size_t pipe_size;
	bool splice_in_pieces; /* large reads went in pieces (moved off page alignment): try that first */

	uint8_t *rx;
	size_t rx_start, rx_end;
	bool rx_drained;          /* the last recv emptied the socket */
	unsigned corked_replies;  /* replies the reader queued since it last sent */
	unsigned hold_skip;       /* batches to send without holding */
	unsigned hold_backoff;    /* the next hold_skip after a failed hold */
	unsigned refused;         /* requests refused by the checks (reader only) */

	pthread_mutex_t lock;
	pthread_cond_t cond;      /* a slot was released */
	struct nbd_slot *slots, *free_slots;
	unsigned inflight;
	size_t bytes;
	struct nbd_slot *tx_head, *tx_tail;
	bool sending, corked, broken;
	pthread_t reader_tid;
	/* Completions on other threads (io_uring, workers) hand their replies
	 * to this thread, so that a client that stops reading can block only
	 * its own connection, never a backend's shared completion thread. */
	pthread_t sender;
	bool has_sender, closing;
	pthread_cond_t tx_cond;
};

struct nbd_state {
	struct devio_server *srv;
	struct devio_addr addr;
	char name[300];
	struct devio_listener *listener; /* lib/listener.c: accept, cap, stop grace */
	unsigned depth;
	struct devio_workers *workers;
	int tls_mode;                    /* enum devio_tls_mode */
	struct devio_tls_creds *tls_creds;
};

/* nbd_tx.c: the slot pool and the sender */
struct nbd_slot *nbd_slot_get(struct nbd_conn *c, size_t bytes);
int nbd_slot_reserve(struct nbd_slot *sl, size_t len);
void nbd_tx_flush_locked(struct nbd_conn *c, bool by_reader);
void nbd_tx_queue(struct nbd_conn *c, struct nbd_slot *sl);
void *nbd_sender_main(void *arg);
void nbd_tx_uncork(struct nbd_conn *c);
void nbd_tx_cork(struct nbd_conn *c);
void nbd_tx_spliced(struct nbd_conn *c, struct nbd_slot *sl, size_t len);
/* The same in pieces: the header (taking the sender's turn), then pieces
 * from the pipe or from memory, then the end (giving the turn back).  A
 * failed send marks the connection broken; the rest are then no-ops. */
void nbd_tx_spliced_begin(struct nbd_conn *c, struct nbd_slot *sl);
void nbd_tx_spliced_more(struct nbd_conn *c, size_t len);
void nbd_tx_copied_more(struct nbd_conn *c, void *buf, size_t len, bool last);
void nbd_tx_spliced_end(struct nbd_conn *c, struct nbd_slot *sl);
void nbd_slot_complete(struct devio_request *req);

/* nbd_reply.c: reply encoders */
const char *nbd_cmd_label(uint16_t type, char *buf, size_t len);
void nbd_encode_reply(struct nbd_slot *sl, uint32_t error, const char *why);
void nbd_encode_read_header(struct nbd_slot *sl);

/* nbd_rx.c: the reader */
bool nbd_rx_ready_soon(struct nbd_conn *c);
ssize_t nbd_rx_recv(struct nbd_conn *c, void *buf, size_t len, bool nonblock);
int nbd_handle_one(struct nbd_conn *c);

/* nbd_fast.c: zero-copy paths */
void nbd_pipe_empty(struct nbd_conn *c);
bool nbd_read_in_place(struct nbd_conn *c, const struct devio_nbd_request *nr);
bool nbd_read_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr);
int nbd_write_in_place(struct nbd_conn *c, struct devio_nbd_request *nr);
int nbd_write_spliced(struct nbd_conn *c, const struct devio_nbd_request *nr);
void nbd_pipe_setup(struct nbd_conn *c);

#endif
