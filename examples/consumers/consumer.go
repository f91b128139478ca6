// Consume a token from refresher in Go, standard library only: read the token file
// (format raw), report the token rejected (as after an HTTP 401), and reload the
// file when it changes until it holds the fresh token the daemon answered with.
//
//	go run consumer.go TOKEN_FILE JOB [TENANT] [DAEMON_URL]
//
// Sends $REFRESHER_CONSUMER_TOKEN as the bearer secret when it is set.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strings"
	"syscall"
	"time"
)

var errLinkInvalid = errors.New("the daemon says the link is invalid: stop calling")

// readToken reads the whole file at once: refresher replaces it by rename, never in place.
func readToken(path string) (string, error) {
	data, err := os.ReadFile(path)
	return strings.TrimSpace(string(data)), err
}

// fingerprint is the first 12 hex digits of the token's SHA-256: how the daemon names a token.
func fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])[:12]
}

// stamp changes at every rewrite: each one renames a new file (a new inode) into place.
func stamp(path string) string {
	info, err := os.Stat(path)
	if err != nil {
		return "gone"
	}
	inode := uint64(0)
	if st, ok := info.Sys().(*syscall.Stat_t); ok {
		inode = st.Ino
	}
	return fmt.Sprintf("%d %d", inode, info.ModTime().UnixNano())
}

// reportRejected posts /v1/tokens/{job}/refresh?rejected=FP[&tenant=T] and returns
// the fingerprint of the token the daemon has in its place.
func reportRejected(daemon, job, tenant, token string) (string, error) {
	query := url.Values{"rejected": {fingerprint(token)}}
	if tenant != "" {
		query.Set("tenant", tenant)
	}
	target := fmt.Sprintf("%s/v1/tokens/%s/refresh?%s", daemon, url.PathEscape(job), query.Encode())
	request, err := http.NewRequest(http.MethodPost, target, nil)
	if err != nil {
		return "", err
	}
	if secret := os.Getenv("REFRESHER_CONSUMER_TOKEN"); secret != "" {
		request.Header.Set("Authorization", "Bearer "+secret)
	}
	client := http.Client{Timeout: 30 * time.Second}
	response, err := client.Do(request)
	if err != nil {
		return "", err
	}
	defer response.Body.Close()
	if response.StatusCode == http.StatusConflict {
		return "", errLinkInvalid
	}
	if response.StatusCode != http.StatusOK {
		return "", fmt.Errorf("report failed: HTTP %d", response.StatusCode)
	}
	var answer struct {
		Fingerprint string `json:"fingerprint"`
	}
	err = json.NewDecoder(response.Body).Decode(&answer)
	return answer.Fingerprint, err
}

// waitFor polls the file every 0.2 s, re-reading it when it changed, until it holds
// the token `wanted` names.
func waitFor(path, wanted string, timeout time.Duration) error {
	last := ""
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if now := stamp(path); now != last {
			last = now
			if token, err := readToken(path); err == nil && fingerprint(token) == wanted {
				return nil
			}
		}
	}
	return fmt.Errorf("the file never held %s", wanted)
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: consumer TOKEN_FILE JOB [TENANT] [DAEMON_URL]")
		os.Exit(2)
	}
	path, job, tenant, daemon := os.Args[1], os.Args[2], "", "http://127.0.0.1:9464"
	if len(os.Args) > 3 {
		tenant = os.Args[3]
	}
	if len(os.Args) > 4 {
		daemon = os.Args[4]
	}
	token, err := readToken(path)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("token", fingerprint(token))
	fresh, err := reportRejected(daemon, job, tenant, token)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		if errors.Is(err, errLinkInvalid) {
			os.Exit(3)
		}
		os.Exit(1)
	}
	fmt.Println("answer", fresh)
	if err := waitFor(path, fresh, 30*time.Second); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("reloaded", fresh)
}
