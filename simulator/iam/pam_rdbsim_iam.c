/*
 * pam_rdbsim_iam: a PAM auth module for the resilient_db simulator's IAM enforcement.
 *
 * Why not pam_exec with expose_authtok: pam_exec copies the password with
 * strndupa(..., PAM_MAX_RESP_SIZE), so it hands at most 512 bytes to its program, and an RDS
 * IAM auth token is longer than that (1,000+ bytes). This module asks the application's
 * conversation function for the password itself (or takes PAM_AUTHTOK when an earlier module
 * set it), keeps it whole, and runs the verifier program given in the service file:
 *
 *     auth required /path/pam_rdbsim_iam.so /path/python -I /path/verify.py
 *
 * The program gets the PAM user as its last argument and the password on stdin; exit status
 * 0 means "accept". It runs as the server's OS user (the module runs inside the server process:
 * the PostgreSQL backend, or mariadbd with auth_pam_v1) in the server's working directory (its
 * data directory), which is how the verifier finds the instance it speaks for. Nothing here
 * logs the password.
 */
#define PAM_SM_AUTH
#define PAM_SM_ACCOUNT
#include <errno.h>
#include <security/pam_ext.h>
#include <security/pam_modules.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_TOKEN 16384 /* far above any IAM token; a pipe buffer holds it whole */
#define MAX_ARGS 32

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Reports why a login could not be checked on stderr (the server's log); never the token. */
static int fail(const char *what, int error) {
    fprintf(stderr, "pam_rdbsim_iam: %s failed: %s\n", what, strerror(error));
    return PAM_SYSTEM_ERR;
}

static int verify(int argc, const char **argv, const char *user, const char *token) {
    char *args[MAX_ARGS + 2];
    char *envp[] = {"PATH=/usr/bin:/bin", "LC_ALL=C.UTF-8", NULL};
    posix_spawn_file_actions_t actions;
    int fds[2], status = 0, i, rc;
    pid_t pid;
    size_t len = strlen(token);

    if (argc < 1 || argc > MAX_ARGS || len == 0 || len > MAX_TOKEN) return PAM_AUTH_ERR;
    for (i = 0; i < argc; i++) args[i] = (char *)argv[i];
    args[argc] = (char *)user;
    args[argc + 1] = NULL;
    if (pipe(fds) != 0) return fail("pipe", errno);
    /* Written before the program starts (it fits in the pipe buffer), so a program that exits
     * without reading cannot raise SIGPIPE in the server process. */
    if (write_all(fds[1], token, len) != 0 || write_all(fds[1], "\n", 1) != 0) {
        rc = errno;
        close(fds[0]);
        close(fds[1]);
        return fail("write", rc);
    }
    close(fds[1]);
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, fds[0], 0);
    posix_spawn_file_actions_addclose(&actions, fds[0]);
    rc = posix_spawn(&pid, argv[0], &actions, NULL, args, envp);
    posix_spawn_file_actions_destroy(&actions);
    close(fds[0]);
    if (rc != 0) return fail("posix_spawn", rc);
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) return fail("waitpid", errno); /* e.g. SIGCHLD ignored */
    }
    return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? PAM_SUCCESS : PAM_AUTH_ERR;
}

PAM_EXTERN int pam_sm_authenticate(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    const char *user = NULL;
    const void *item = NULL;
    char *resp = NULL;
    int rc;
    (void)flags;

    if (pam_get_user(pamh, &user, NULL) != PAM_SUCCESS || user == NULL || *user == '\0')
        return PAM_USER_UNKNOWN;
    if (pam_get_item(pamh, PAM_AUTHTOK, &item) == PAM_SUCCESS && item != NULL)
        return verify(argc, argv, user, (const char *)item);
    rc = pam_prompt(pamh, PAM_PROMPT_ECHO_OFF, &resp, "Password: ");
    if (rc != PAM_SUCCESS || resp == NULL) {
        free(resp);
        return rc == PAM_SUCCESS ? PAM_AUTH_ERR : rc;
    }
    rc = verify(argc, argv, user, resp);
    explicit_bzero(resp, strlen(resp));
    free(resp);
    return rc;
}

PAM_EXTERN int pam_sm_setcred(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}

PAM_EXTERN int pam_sm_acct_mgmt(pam_handle_t *pamh, int flags, int argc, const char **argv) {
    (void)pamh; (void)flags; (void)argc; (void)argv;
    return PAM_SUCCESS;
}
