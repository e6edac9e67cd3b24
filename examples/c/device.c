/*
 * A device program in C on the devtables device library (crates/capi, include/devtables.h).
 *
 * It starts the agent from its configuration file (the file `devtables-agent --config` reads),
 * prints every change of its database, raises a fault (a `Fault` item: it syncs up to the cloud),
 * and answers the `reboot` command: when the cloud writes a `Command` item {command: "reboot"} for
 * this device, the handler below runs on the agent's thread and replies; the agent writes the
 * reply into the item, which syncs back up. The program then waits until the cloud has
 * acknowledged everything, stops the agent and exits 0 ("rebooting"). Without a reboot command it
 * exits 2 after SECONDS (default 120).
 *
 * Build (see README.md "From C", docs/device.md):
 *   cargo build -p devtables-capi
 *   cc -std=c11 -Wall -o device examples/c/device.c -I crates/capi/include \
 *      -L target/debug -ldevtables_capi -Wl,-rpath,"$PWD/target/debug"
 * Run:
 *   ./device examples/agent.json5 gw-1
 */
/* nanosleep is POSIX, outside strict C11. */
#define _POSIX_C_SOURCE 200809L

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "devtables.h"

/* Set by the reboot handler (agent thread), read by main. */
static atomic_int reboot_requested;

/* Prints what failed and why, stops the agent (if any) and exits 1. */
static void fail(const char *what, dt_code code, dt_agent *agent) {
    fprintf(stderr, "device: %s failed: %s: %s\n", what, dt_code_name(code), dt_last_error());
    dt_agent_stop(agent);
    exit(1);
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* Change callback: runs after each commit, on the writer's thread (ours, or the agent's for
 * changes from the cloud). The JSON is valid during the call only. */
static void on_change(void *user, const char *change_json) {
    (void)user;
    printf("change: %s\n", change_json);
    fflush(stdout);
}

/* Command handler for `reboot`: runs on the agent's thread; keep it short. A real device would
 * schedule the reboot; this one tells main, which finishes syncing and exits. The reply is
 * copied by the library: no allocation crosses the boundary. */
static void on_reboot(void *user, const char *command_json, dt_reply *reply) {
    (void)user;
    printf("reboot requested: %s\n", command_json);
    fflush(stdout);
    atomic_store(&reboot_requested, 1);
    dt_reply_ok(reply, "{\"rebooting\": true, \"by\": \"examples/c/device.c\"}");
}

/* Whether a command item is still waiting for its result in the local database. */
static int command_pending(dt_db *db, dt_agent *agent) {
    char *page = NULL;
    dt_code rc = dt_find(db, "Command", "{\"status\": \"pending\"}", "{\"limit\": 1}", &page);
    if (rc != DT_OK) {
        fail("dt_find Command", rc, agent);
    }
    int pending = strstr(page, "\"items\":[]") == NULL;
    dt_free(page);
    return pending;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s AGENT_CONFIG DEVICE_ID [SECONDS]\n", argv[0]);
        return 64;
    }
    const char *config = argv[1];
    const char *device = argv[2];
    long seconds = argc > 3 ? atol(argv[3]) : 120;
    printf("devtables %s\n", dt_version());

    /* The agent opens the schema and database its file names (db NULL). */
    dt_agent *agent = NULL;
    dt_code rc = dt_agent_start(NULL, config, &agent);
    if (rc != DT_OK) {
        fail("dt_agent_start", rc, NULL);
    }
    dt_db *db = dt_agent_db(agent);

    uint64_t subscription = 0;
    if ((rc = dt_subscribe(db, on_change, NULL, &subscription)) != DT_OK) {
        fail("dt_subscribe", rc, agent);
    }
    if ((rc = dt_on_command(agent, "reboot", on_reboot, NULL)) != DT_OK) {
        fail("dt_on_command", rc, agent);
    }

    /* Raise a fault. It is stored at once (offline too) and synced up when the cloud is there. */
    char fault[512];
    snprintf(fault, sizeof fault,
             "{\"deviceId\": \"%s\", \"severity\": \"critical\", "
             "\"message\": \"temperature above limit (C example)\", \"source\": \"device.c\"}",
             device);
    char *stored = NULL;
    if ((rc = dt_create(db, "Fault", fault, &stored)) != DT_OK) {
        fail("dt_create Fault", rc, agent);
    }
    printf("fault raised: %s\n", stored);
    fflush(stdout);
    dt_free(stored);

    if ((rc = dt_agent_wait_ready(agent, 30000)) != DT_OK) {
        /* Not fatal: the agent keeps reconnecting and the fault waits in the outbox. */
        fprintf(stderr, "device: not connected yet: %s\n", dt_last_error());
    } else {
        printf("ready\n");
        fflush(stdout);
    }

    /* Wait for the reboot command. */
    for (long waited = 0; !atomic_load(&reboot_requested); waited += 100) {
        if (waited >= seconds * 1000) {
            fprintf(stderr, "device: no reboot command in %ld s\n", seconds);
            dt_agent_stop(agent);
            return 2;
        }
        sleep_ms(100);
    }

    /* The agent writes the handler's reply after the handler returns: wait until no command is
     * pending locally, then until the cloud has acknowledged every change (the reply included). */
    for (long waited = 0; command_pending(db, agent); waited += 20) {
        if (waited >= 30000) {
            fprintf(stderr, "device: the reboot reply was not stored in 30 s\n");
            dt_agent_stop(agent);
            return 1;
        }
        sleep_ms(20);
    }
    if ((rc = dt_agent_wait_synced(agent, 30000)) != DT_OK) {
        fail("dt_agent_wait_synced", rc, agent);
    }
    char *status = NULL;
    if ((rc = dt_agent_status(agent, &status)) != DT_OK) {
        fail("dt_agent_status", rc, agent);
    }
    printf("status: %s\n", status);
    dt_free(status);

    if ((rc = dt_unsubscribe(db, subscription)) != DT_OK) {
        fail("dt_unsubscribe", rc, agent);
    }
    /* Stops replication and closes the database the agent opened. */
    if ((rc = dt_agent_stop(agent)) != DT_OK) {
        fprintf(stderr, "device: dt_agent_stop: %s\n", dt_last_error());
        return 1;
    }
    printf("rebooting\n");
    return 0;
}
